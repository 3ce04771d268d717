"""``python -m ojakv.lm_eval ...``: lm-eval's own command line, with ``--model ojakv`` registered and ojakv's
offline tasks (``ojakv_local``, ...) on the task path.

lm-eval 0.4 discovers models only through its registry, filled at import time, and loads no plugins, so a plain
``lm_eval --model ojakv`` cannot find the adapter; this wrapper imports it first and then hands every argument to
lm-eval unchanged (adding ``--include_path`` for the shipped tasks when tasks are named).
"""

from __future__ import annotations

import sys

from .lm_eval_adapter import OjaKVLM  # noqa: F401  (registers --model ojakv)
from .lm_eval_tasks import TASKS_DIR


def with_task_path(argv: list[str]) -> list[str]:
    """``argv`` with the shipped tasks' folder added to ``--include_path`` (lm-eval joins folders with ':')."""
    names_tasks = argv[:1] == ["ls"] or any(arg in ("--tasks", "-t") or arg.startswith("--tasks=") for arg in argv)
    if not names_tasks:
        return argv
    for i, arg in enumerate(argv):
        if arg == "--include_path" and i + 1 < len(argv):
            return [*argv[: i + 1], f"{argv[i + 1]}:{TASKS_DIR}", *argv[i + 2 :]]
        if arg.startswith("--include_path="):
            return [*argv[:i], f"{arg}:{TASKS_DIR}", *argv[i + 1 :]]
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *with_task_path(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()

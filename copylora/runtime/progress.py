"""The progress bar the merge and resize commands show while the engine runs."""

from __future__ import annotations

from tqdm import tqdm


class ModuleProgress:
    """Call with (done, total) as groups of modules finish; a context manager that closes the bar
    when the work ends or fails."""

    def __init__(self, desc: str, disable: bool) -> None:
        self.desc, self.disable = desc, disable
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:  # created on first progress, so a failed load prints no empty bar
            self.bar = tqdm(desc=self.desc, unit="module", total=total, disable=self.disable)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()  # finished: the log lines that follow start on a line of their own

    def __enter__(self) -> "ModuleProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

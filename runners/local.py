"""In-process: the search evaluates its own candidates."""

from __future__ import annotations

from tyrsearch.runners.base import Runner
from tyrsearch.search.driver import Search, Winner


class LocalRunner(Runner):
    def run(self, search: Search) -> Winner:
        return search.run()

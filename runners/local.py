"""In-process: the search evaluates its own candidates."""

from __future__ import annotations

from tyrsearch.runners.base import Runner
from tyrsearch.search.driver import Search, SearchResult


class LocalRunner(Runner):
    def run(self, search: Search) -> SearchResult:
        return search.run()

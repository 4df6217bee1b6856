"""The runner seam: a runner takes a prepared search and runs it where it runs."""

from __future__ import annotations

import abc

from tyrsearch.search.driver import Search, SearchResult


class Runner(abc.ABC):
    @abc.abstractmethod
    def run(self, search: Search) -> SearchResult:
        """Run the search to its winner (the study holds everything; a rerun resumes it)."""

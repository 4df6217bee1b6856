"""The runner seam: a runner takes a prepared search and runs it where it runs."""

from __future__ import annotations

import abc

from tyrsearch.search.driver import Search, Winner


class Runner(abc.ABC):
    @abc.abstractmethod
    def run(self, search: Search) -> Winner:
        """Run the search to its winner (the study holds everything; a rerun resumes it)."""

"""The sweep report: tables (CSV/JSON/terminal), figures (PNG/SVG) and one offline HTML page.

Everything is computed from the results store alone (``optarena.analysis``), without torch.
"""

from __future__ import annotations

from optarena.report.build import write_report

__all__ = ["write_report"]

"""`signtrap report RUN`: one self-contained report.html (PNG images inlined as base64, inline CSS, no
scripts, opens offline) and report.md (images in report_files/), built from what a run directory holds.

Every section is always present; a section whose inputs are absent says so instead of vanishing.
"""
from signtrap.reporting.build import REPORT_VERSION, SECTIONS, build_report, collect_sections

__all__ = ["REPORT_VERSION", "SECTIONS", "build_report", "collect_sections"]

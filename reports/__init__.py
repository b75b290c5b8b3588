"""Leaderboard reports (HTML, Markdown, JSON, CSV) built from `bench run` directories."""

from reports.render import build_report

__all__ = ["build_report"]

"""Views of the analysis results: terminal tables, JSON, plots, reports."""

"""Streamlit dashboards over run directories (reads through `diagnose`)."""

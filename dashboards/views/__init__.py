"""The dashboard pages (run by st.navigation as scripts; a package so that wheels include them)."""

"""The web dashboard (/ui/): routes in dashboard.py, Jinja2 templates and one stylesheet beside it."""

"""Template context shared by every page that extends base.html."""

from django.urls import reverse

# Each top navigation link: its key in ``nav_current``, its URL name, and the
# path prefixes of the pages it leads to. A run page belongs to Workflows.
NAVIGATION = (
    ("workflows", "workflow-list", ("/workflows/", "/runs/")),
    ("models", "models", ("/models/",)),
    ("billing", "billing-history", ("/billing/",)),
    ("tokens", "tokens", ("/tokens/",)),
)


def navigation(request) -> dict:
    """Mark the top navigation link of the page being shown.

    ``nav_current`` maps a link's key to its aria-current value: "page" on
    the page the link opens, "true" on the other pages of its section.
    """
    current = {}
    for key, url_name, prefixes in NAVIGATION:
        if request.path == reverse(url_name):
            current[key] = "page"
        elif request.path.startswith(prefixes):
            current[key] = "true"
    return {"nav_current": current}

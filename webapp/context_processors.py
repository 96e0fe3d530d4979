"""Template context for the site navigation, shown by base.html and the admin pages."""

from django.urls import reverse

# Each top navigation link: its key in ``nav_current``, its URL name, and the
# path prefixes of the pages it leads to. A run page belongs to Workflows,
# and every admin page but the fleet page belongs to Admin.
NAVIGATION = (
    ("workflows", "workflow-list", ("/workflows/", "/runs/")),
    ("models", "models", ("/models/",)),
    ("billing", "billing-history", ("/billing/",)),
    ("tokens", "tokens", ("/tokens/",)),
    ("fleet", "admin:runner_fleet", ()),
    ("admin", "admin:index", ("/admin/",)),
)


def navigation(request) -> dict:
    """Mark the top navigation link of the page being shown.

    ``nav_current`` maps a link's key to its aria-current value: "page" on
    the page the link opens, "true" on the other pages of its section. At
    most one link is marked, so the fleet page, which sits under /admin/,
    marks Fleet and not Admin.
    """
    for key, url_name, _ in NAVIGATION:
        if request.path == reverse(url_name):
            return {"nav_current": {key: "page"}}
    for key, _, prefixes in NAVIGATION:
        if prefixes and request.path.startswith(prefixes):
            return {"nav_current": {key: "true"}}
    return {"nav_current": {}}

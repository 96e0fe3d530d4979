from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class WebappConfig(AppConfig):
    name = "webapp"
    verbose_name = "Accounts and API tokens"


class ThrottledAdminConfig(admin_apps.AdminConfig):
    """Django's admin app, whose site limits failed sign-ins (login_throttle.py)."""

    # WebappConfig stays the config that INSTALLED_APPS' "webapp" picks.
    default = False
    default_site = "webapp.login_throttle.ThrottledAdminSite"

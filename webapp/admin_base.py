"""Base classes for the project's admin pages."""

from django.contrib import admin


class ViewOnlyModelAdmin(admin.ModelAdmin):
    """An admin that shows rows and never adds, changes or deletes them.

    Each subclass gives in its docstring the reason its rows are only viewed.
    """

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

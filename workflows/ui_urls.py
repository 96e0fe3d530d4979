from django.urls import path

from workflows import ui

urlpatterns = [
    path("", ui.workflow_list, name="workflow-list"),
    path("new", ui.workflow_new, name="workflow-new"),
    path("<int:workflow_id>/edit", ui.workflow_edit, name="workflow-edit"),
]

from django.urls import path

from workflows import ui

urlpatterns = [
    path("", ui.workflow_list, name="workflow-list"),
]

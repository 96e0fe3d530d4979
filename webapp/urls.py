from django.contrib import admin
from django.urls import include, path

from runner import views as runner_views
from webapp import roboflow
from workflows import views as workflow_views

api = [
    path("workflows/", workflow_views.WorkflowListView.as_view()),
    path("workflows/<int:workflow_id>", workflow_views.WorkflowDetailView.as_view()),
    path("workflows/<int:workflow_id>/versions",
         workflow_views.WorkflowVersionsView.as_view()),
    path("workflows/<int:workflow_id>/runs", workflow_views.WorkflowRunView.as_view()),
    path("validate", workflow_views.ValidateView.as_view()),
    path("blocks", workflow_views.BlocksView.as_view()),
    path("runs/", runner_views.RunListView.as_view()),
    path("runs/<uuid:run_id>", runner_views.RunDetailView.as_view()),
    path("models/", runner_views.ModelListView.as_view()),
    path("fleet", runner_views.FleetView.as_view()),
]

urlpatterns = [
    path("admin/django-rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
    path("api/", include(api)),
    path("info", roboflow.InfoView.as_view()),
    path("workflows/run", roboflow.InlineWorkflowRunView.as_view()),
    path("infer/workflows", roboflow.InlineWorkflowRunView.as_view()),
    path("infer/workflows/<str:workspace>/<slug:workflow_id>",
         roboflow.StoredWorkflowRunView.as_view()),
    path("<str:workspace>/workflows/<slug:workflow_id>",
         roboflow.StoredWorkflowRunView.as_view()),
]

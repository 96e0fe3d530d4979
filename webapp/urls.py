import functools

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from django_rq.urls import get_admin_urlpatterns, get_api_urlpatterns

from runner import ui as runner_ui
from runner import views as runner_views
from webapp import (
    converters,  # noqa: F401 (registers anycase_uuid)
    handlers,
    roboflow,
    roboflow_models,
)
from webapp import views as account_views
from webapp.login_throttle import ThrottledLoginView, ThrottledPasswordChangeView
from workflows import views as workflow_views

api = [
    path("workflows/", workflow_views.WorkflowListView.as_view()),
    path("workflows/<int:workflow_id>", workflow_views.WorkflowDetailView.as_view()),
    path(
        "workflows/<int:workflow_id>/versions",
        workflow_views.WorkflowVersionsView.as_view(),
    ),
    path("workflows/<int:workflow_id>/runs", workflow_views.WorkflowRunView.as_view()),
    path(
        "workflows/<int:workflow_id>/estimate",
        workflow_views.WorkflowEstimateView.as_view(),
    ),
    path("estimate", workflow_views.EstimateView.as_view()),
    path("validate", workflow_views.ValidateView.as_view()),
    path("blocks", workflow_views.BlocksView.as_view()),
    path("runs/", runner_views.RunListView.as_view()),
    path("runs/<anycase_uuid:run_id>", runner_views.RunDetailView.as_view()),
    path("models/", runner_views.ModelListView.as_view()),
    path("models/<path:model_id>", runner_views.ModelDetailView.as_view()),
    path("fleet", runner_views.FleetView.as_view()),
    # Any other path under /api/ gets a JSON 404, whatever the method.
    # Otherwise Roboflow's <workspace>/workflows/<id> route below would take
    # /api/workflows/<not a number> as workspace "api" and return 405. The
    # view is exempt from the CSRF check, which returns an HTML 403 to a POST.
    re_path(r"", csrf_exempt(handlers.not_found)),
]

# Django's auth routes except password reset. A reset sends email, which the
# server has no settings for, so each request logged an SMTP traceback and
# showed the user that a message had been sent. Django's form views handle
# PUT like POST and return an empty 405 for other methods, so they are
# limited to their methods like the other pages.
accounts = [
    path(
        "login/",
        handlers.allow_methods("GET", "POST")(ThrottledLoginView.as_view()),
        name="login",
    ),
    path(
        "logout/",
        handlers.allow_methods("POST")(account_views.LogoutView.as_view()),
        name="logout",
    ),
    # The password change pages have templates of their own, in the site's
    # layout. Django's, which the admin app supplies, show the admin's
    # header, whose Home link sends a user who is not staff to the admin's
    # sign-in page.
    path(
        "password_change/",
        handlers.allow_methods("GET", "POST")(
            ThrottledPasswordChangeView.as_view(
                template_name="registration/account_password_change.html"
            )
        ),
        name="password_change",
    ),
    path(
        "password_change/done/",
        handlers.allow_methods("GET")(
            auth_views.PasswordChangeDoneView.as_view(
                template_name="registration/account_password_change_done.html"
            )
        ),
        name="password_change_done",
    ),
]


def superuser_required(view):
    """Serve ``view`` to active superusers only.

    Other signed-in users get 403, and anonymous ones the admin's sign-in page.
    """

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        user = request.user
        if user.is_active and user.is_superuser:
            return view(request, *args, **kwargs)
        if user.is_authenticated:
            raise PermissionDenied("RQ's queue pages are for superusers only")
        return redirect_to_login(request.get_full_path(), "admin:login")

    return wrapper


# RQ's pages empty queues and delete or requeue jobs of every user, and
# django-rq lets any staff user do that, whatever their permissions. The
# read-only statistics (stats.json, metrics) keep django-rq's own check:
# staff, or RQ_API_TOKEN.
rq_urls = (
    get_api_urlpatterns() + get_admin_urlpatterns(view_wrapper=superuser_required),
    "django_rq",
)

urlpatterns = [
    path("", account_views.home, name="home"),
    path("accounts/", include(accounts)),
    path("tokens/", account_views.tokens, name="tokens"),
    path("admin/django-rq/", include(rq_urls)),
    path("admin/", admin.site.urls),
    path("api/", include(api)),
    path("metrics", runner_views.MetricsView.as_view()),
    path("info", roboflow.InfoView.as_view()),
    path("model/registry", roboflow_models.ModelRegistryView.as_view()),
    path("model/add", roboflow_models.ModelAddView.as_view()),
    path("infer/object_detection", roboflow_models.ObjectDetectionView.as_view()),
    # Listed before the workflow pages: POST /workflows/run is Roboflow's route.
    path("workflows/run", roboflow.InlineWorkflowRunView.as_view()),
    path(
        "workflows/<int:workflow_id>/run/",
        runner_ui.run_workflow_page,
        name="run-workflow",
    ),
    path("workflows/", include("workflows.ui_urls")),
    path("samples/<str:name>", runner_ui.sample_image, name="sample-image"),
    path("models/", runner_ui.models_page, name="models"),
    path("runs/<anycase_uuid:run_id>/", runner_ui.run_page, name="run-page"),
    path("billing/", include("billing.urls")),
    path("infer/workflows", roboflow.InlineWorkflowRunView.as_view()),
    path(
        "infer/workflows/<str:workspace>/<slug:workflow_id>",
        roboflow.StoredWorkflowRunView.as_view(),
    ),
    path(
        "<str:workspace>/workflows/<slug:workflow_id>",
        roboflow.StoredWorkflowRunView.as_view(),
        name=workflow_views.STORED_ROUTE_NAME,
    ),
]

handler400 = "webapp.handlers.bad_request"
handler404 = "webapp.handlers.not_found"
handler500 = "webapp.handlers.server_error"

from django.urls import path

from billing import views
from webapp import converters  # noqa: F401 (registers anycase_uuid)

urlpatterns = [
    path("", views.history, name="billing-history"),
    path("export.csv", views.export_csv, name="billing-export"),
    path("summary.json", views.summary_json, name="billing-summary"),
    path("runs/<anycase_uuid:run_id>/", views.explain, name="bill-explain"),
]

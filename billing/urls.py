from django.urls import path

from billing import views

urlpatterns = [
    path("", views.history, name="billing-history"),
    path("export.csv", views.export_csv, name="billing-export"),
    path("summary.json", views.summary_json, name="billing-summary"),
    path("runs/<uuid:run_id>/", views.explain, name="bill-explain"),
]

from django.urls import path

from billing import views

urlpatterns = [
    path("", views.history, name="billing-history"),
]

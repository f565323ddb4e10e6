from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from conversations import views
from review.usage import usage_view

urlpatterns = [
    path("", include("conversations.urls")),
    # Unnamespaced, where LOGIN_URL and LOGOUT_REDIRECT_URL look for them.
    path("accounts/signup/", views.signup, name="signup"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Before the admin's own URLs, whose catch-all would answer 404.
    path("admin/usage/", admin.site.admin_view(usage_view), name="admin-usage"),
    path("admin/", admin.site.urls),
]

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from conversations import views

urlpatterns = [
    path("", views.chat, name="chat"),
    path("c/<uuid:pk>/", views.conversation, name="conversation"),
    path("c/<uuid:pk>/rename/", views.rename, name="conversation-rename"),
    path("c/<uuid:pk>/delete/", views.delete, name="conversation-delete"),
    path("c/<uuid:pk>/settings/", views.conversation_settings, name="conversation-settings"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:pk>/revoke/", views.token_revoke, name="token-revoke"),
    path("accounts/signup/", views.signup, name="signup"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
]

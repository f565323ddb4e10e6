from django.urls import path

from . import views

app_name = "conversations"

urlpatterns = [
    path("", views.chat, name="chat"),
    path("c/<uuid:pk>/", views.conversation, name="conversation"),
    path("c/<uuid:pk>/rename/", views.rename, name="rename"),
    path("c/<uuid:pk>/delete/", views.delete, name="delete"),
    path("c/<uuid:pk>/settings/", views.conversation_settings, name="settings"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:pk>/revoke/", views.token_revoke, name="token-revoke"),
]

from django.urls import path

from . import account, views

app_name = "conversations"

urlpatterns = [
    path("", views.chat, name="chat"),
    path("c/<uuid:pk>/", views.conversation, name="conversation"),
    path("c/<uuid:pk>/rename/", views.rename, name="rename"),
    path("c/<uuid:pk>/delete/", views.delete, name="delete"),
    path("c/<uuid:pk>/settings/", views.conversation_settings, name="settings"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:pk>/revoke/", views.token_revoke, name="token-revoke"),
    # Issue 12: search, export and import, the account page (account.py).
    path("search/", account.search, name="search"),
    path(
        "c/<uuid:pk>/export.md",
        account.export_conversation,
        {"extension": "md"},
        name="export-markdown",
    ),
    path(
        "c/<uuid:pk>/export.json",
        account.export_conversation,
        {"extension": "json"},
        name="export-json",
    ),
    path("account/", account.account, name="account"),
    path("account/export.json", account.export_all, name="export-all"),
    path("account/import/", account.account_import, name="import"),
    path("account/delete/", account.account_delete, name="delete-account"),
]

"""GIN indexes for full-text search of titles and message text (issue 12,
item 9), on Postgres only: SQLite has no GIN, and searches there with a
plain case-insensitive match. Made here rather than in the models' Meta,
which would make every database build them."""

from django.db import migrations

# models.SEARCH_CONFIG when this was written; a query uses an index only when
# it computes the very expression the index holds.
SEARCH_CONFIG = "english"

INDEXES = [
    ("conversation", "title", "conversation_title_search"),
    ("message", "content", "message_content_search"),
]


def _indexes(apps):
    from django.contrib.postgres.indexes import GinIndex
    from django.contrib.postgres.search import SearchVector

    for model, field, name in INDEXES:
        index = GinIndex(SearchVector(field, config=SEARCH_CONFIG), name=name)
        yield apps.get_model("conversations", model), index


def create_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for model, index in _indexes(apps):
        schema_editor.add_index(model, index)


def drop_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for model, index in _indexes(apps):
        schema_editor.remove_index(model, index)


class Migration(migrations.Migration):
    dependencies = [("conversations", "0006_message_system_prompt")]

    operations = [migrations.RunPython(create_indexes, drop_indexes)]

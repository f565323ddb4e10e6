"""Conversations become trees (issue 13): every message gets a parent and
every conversation an active leaf. Before this a conversation was a list in
which a regenerated reply stayed, marked superseded, before the reply that
replaced it. Read oldest first, each message follows the last message not
superseded before it: a superseded reply and its replacement get the same
parent (the question), so they become versions of one reply, and the last
message not superseded is the active leaf. Message.save() follows the same
rule for messages added without a parent."""

import django.db.models.deletion
from django.db import migrations, models


def build_trees(apps, schema_editor):
    Conversation = apps.get_model("conversations", "Conversation")
    Message = apps.get_model("conversations", "Message")
    db = schema_editor.connection.alias
    conversations = list(Conversation.objects.using(db).values_list("pk", flat=True))
    for conversation in conversations:
        messages = list(
            Message.objects.using(db)
            .filter(conversation_id=conversation)
            .order_by("created", "pk")
            .only("pk", "superseded", "parent")
        )
        tip = None
        for message in messages:
            message.parent_id = tip
            if not message.superseded:
                tip = message.pk
        Message.objects.using(db).bulk_update(messages, ["parent"], batch_size=500)
        if tip is not None:
            Conversation.objects.using(db).filter(pk=conversation).update(active=tip)


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0007_search_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="parent",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="children",
                to="conversations.message",
            ),
        ),
        migrations.AddField(
            model_name="conversation",
            name="active",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="conversations.message",
            ),
        ),
        migrations.RunPython(build_trees, migrations.RunPython.noop, elidable=False),
    ]

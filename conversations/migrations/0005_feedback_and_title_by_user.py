import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0004_reply_caps_and_error_detail"),
    ]

    operations = [
        migrations.AddField(
            model_name="conversation",
            name="title_by_user",
            field=models.BooleanField(default=False),
        ),
        migrations.CreateModel(
            name="Feedback",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "rating",
                    models.SmallIntegerField(choices=[(-1, "thumbs down"), (1, "thumbs up")]),
                ),
                ("comment", models.TextField(blank=True, max_length=2000)),
                (
                    "created",
                    models.DateTimeField(default=django.utils.timezone.now, editable=False),
                ),
                ("updated", models.DateTimeField(default=django.utils.timezone.now)),
                (
                    "message",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="feedback",
                        to="conversations.message",
                    ),
                ),
            ],
            options={
                "verbose_name_plural": "feedback",
            },
        ),
    ]

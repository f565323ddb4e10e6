"""The Reviewers group: staff who read conversations, messages and feedback,
flag and resolve, and read the access log; nothing else."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP = "Reviewers"
PERMISSIONS = [
    ("conversations", "view_conversation"),
    ("conversations", "view_message"),
    ("conversations", "view_feedback"),
    ("review", "view_flag"),
    ("review", "add_flag"),
    ("review", "change_flag"),
    ("review", "view_accesslog"),
]


def create_reviewers(apps, schema_editor):
    # On a fresh database the permissions are only made after all the
    # migrations ran (post_migrate): make them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name=GROUP)
    for app_label, codename in PERMISSIONS:
        group.permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )


def remove_reviewers(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name=GROUP).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("review", "0001_initial"),
        ("conversations", "0005_feedback_and_title_by_user"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_reviewers, remove_reviewers)]

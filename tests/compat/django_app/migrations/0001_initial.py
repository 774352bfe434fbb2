from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="OAuthToken",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("user_id", models.IntegerField()),
                ("provider", models.TextField(default="github")),
                ("access_token", models.TextField(null=True)),
                ("refresh_token", models.TextField(null=True)),
            ],
            options={"db_table": "oauth_tokens"},
        ),
    ]

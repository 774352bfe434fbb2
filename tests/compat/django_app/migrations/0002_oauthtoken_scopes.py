from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("django_app", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="oauthtoken",
            name="scopes",
            field=models.TextField(null=True),
        ),
        migrations.AddIndex(
            model_name="oauthtoken",
            index=models.Index(fields=["user_id"], name="oauth_tokens_user_id_idx"),
        ),
    ]

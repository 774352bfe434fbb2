"""The OAuth token model. The shipped rules seal access_token and refresh_token."""

from __future__ import annotations

from django.db import models


class OAuthToken(models.Model):
    user_id = models.IntegerField()
    provider = models.TextField(default="github")
    access_token = models.TextField(null=True)
    refresh_token = models.TextField(null=True)
    scopes = models.TextField(null=True)

    class Meta:
        app_label = "django_app"
        db_table = "oauth_tokens"
        indexes = [models.Index(fields=["user_id"], name="oauth_tokens_user_id_idx")]

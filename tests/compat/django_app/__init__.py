"""A minimal Django app with one model over the oauth_tokens table."""

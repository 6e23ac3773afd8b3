"""Infrastructure: settings read once from the environment, Redis URLs, timestamps."""

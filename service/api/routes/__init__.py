"""Route modules, one router each, mounted by :func:`service.app.create_app`."""

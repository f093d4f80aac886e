"""Route modules, one router each, mounted by :func:`cpp.service.app.create_app`."""

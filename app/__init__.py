"""The application: settings, FastAPI app, services, database models and the command line."""

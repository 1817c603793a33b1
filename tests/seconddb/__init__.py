"""A second test database (schema ``crm``) for the adversarial suite; see ``data.py``."""

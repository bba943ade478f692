# Generated package: `python -m maas.protogen` writes the modules here.

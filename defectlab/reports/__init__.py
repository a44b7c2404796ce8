"""Reports: tables, figures and pages of finished runs (report, compare, page, students), the
explorer (explorer, explore) and the export of a run as a diffusers folder."""

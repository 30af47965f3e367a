"""Quality-control metrics, detection, reports."""

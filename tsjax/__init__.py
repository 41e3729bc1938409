"""tsjax: teacher-student defect detection for SEM wafer image pairs."""

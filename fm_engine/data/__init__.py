"""DICOM reading, synthetic DICOM generation and datasets (pydicom is imported lazily)."""

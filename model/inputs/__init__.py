"""What comes in: image decoding (DICOM/PNG/JPEG) and radiology report text."""

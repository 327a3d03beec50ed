"""DICOM: pixel data decoded within the budget of every header (:mod:`.pixels`, :mod:`.codestreams`)."""

"""Data: building WebDataset shards from image folders (:mod:`.shards`, :mod:`.sources`), the P x K training
stream (:mod:`.stream`) and evaluation reading (:mod:`.evalset`)."""

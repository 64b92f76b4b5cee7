"""The model cache the Network Node manages (``/api/v1/models/*``): the Hugging Face hub cache, its
downloads and what the node verified of them. See :mod:`.cache`, :mod:`.downloads` and :mod:`.fetch`."""

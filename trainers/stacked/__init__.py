"""``launcher=stacked``: jobs that differ only in their seed train in one process as one stacked model
(``torch.func``: stacked parameters, ``vmap`` forward, one optimizer over the stacked tensors); every
member still gets the run directory its plain run would write."""

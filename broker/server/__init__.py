"""The broker process: transport, dispatch, handlers, daemon entry."""

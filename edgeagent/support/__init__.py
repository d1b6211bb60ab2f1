"""Remote diagnostics: the support bundle, signed support requests and the component serving them."""

"""Credits: claims of work, witness signatures, receipts and the credit policy that prices them."""
